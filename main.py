"""The Cloud Function: one HTTP entry point, `registry`, serving the registry pull API."""
import functions_framework

from builder.config import Config
from builder.http import RegistryPerProcess

# Made at start-up, so a misconfiguration fails the deploy loudly.
_registry = RegistryPerProcess(Config.from_env())


@functions_framework.http
def registry(request):
    return _registry.get().handle(request)
