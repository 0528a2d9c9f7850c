-- The MLflow server's database beside Prefect's (the image creates `prefect` itself).
CREATE DATABASE mlflow OWNER byoai;
