"""Elasticsearch and Kibana assets for openai-elastic, and the installer that pushes them."""

PACKAGE = "openai-elastic"
# The asset bundle's version: written into every asset's `_meta` and bumped when assets change.
VERSION = "0.1.0"
MANAGED_BY = "openai-assets"
