FROM python:3.11-slim
WORKDIR /app
# the CUDA build of torch comes from PyPI's default wheel; a CPU-only image can pin the CPU index
COPY pyproject.toml README.md ./
COPY api ./api
COPY tasks ./tasks
COPY workers ./workers
COPY storage ./storage
RUN pip install --no-cache-dir .
ENV GENMILL_HOME=/data
EXPOSE 8000
CMD ["genmill", "api", "--host", "0.0.0.0", "--port", "8000"]
