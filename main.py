"""The Cloud Function: one HTTP entry point, `registry`, serving the registry pull API."""
import functions_framework

from builder.config import Config
from builder.http import Registry, RegistryPerProcess

# Built at start-up, so a misconfiguration fails the deploy loudly; built again in every
# server process forked after that, since network clients do not survive a fork.
_registry = RegistryPerProcess(lambda: Registry.from_config(Config.from_env()))


@functions_framework.http
def registry(request):
    return _registry.get().handle(request)
