"""Elasticsearch and Kibana assets for openai-elastic, and the installer that pushes them."""
