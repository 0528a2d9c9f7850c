# MLflow server with its basic-auth app, the PostgreSQL driver and the S3 client it needs for served artifacts.
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow[auth]>=3.17,<3.19" "psycopg2-binary>=2.9" boto3
