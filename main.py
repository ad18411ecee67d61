"""The Cloud Function: one HTTP entry point, `registry`, serving the registry pull API."""
import functions_framework

from builder.config import Config
from builder.http import Registry

# Built once per instance, at start-up, so a misconfiguration fails the deploy loudly.
_registry = Registry.from_config(Config.from_env())


@functions_framework.http
def registry(request):
    return _registry.handle(request)
