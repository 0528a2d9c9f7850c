-- The MLflow server's databases beside Prefect's (the image creates `prefect` itself): tracking and
-- the basic-auth app's users and permissions.
CREATE DATABASE mlflow OWNER byoai;
CREATE DATABASE mlflow_auth OWNER byoai;
