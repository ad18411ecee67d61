"""The Cloud Function: one HTTP entry point, `registry`, serving the registry pull API."""
import functions_framework

from builder import server
from builder.config import Config
from builder.http import RegistryPerProcess

# Made at start-up, so a misconfiguration fails the deploy loudly.
_registry = RegistryPerProcess(Config.from_env())
server.configure(on_stop=_registry.shutdown)


@functions_framework.http
def registry(request):
    return _registry.get().handle(request)
