"""Cloud services: MQTT ingest into S3, the caption worker, and the captioning model."""
