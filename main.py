"""The Cloud Function: one HTTP entry point, `registry`, serving the registry pull API."""
import flask
import functions_framework
from werkzeug.exceptions import NotFound

from builder import server
from builder.config import Config
from builder.http import RegistryPerProcess

# Made at start-up, so a misconfiguration fails the deploy loudly.
_registry = RegistryPerProcess(Config.from_env())
server.configure(on_stop=_registry.shutdown)


@functions_framework.http
def registry(request):
    return _registry.get().handle(request)


if flask.has_app_context():  # functions-framework runs this module inside its app's context
    # Its catch-all route `/<path:path>` does not match a path holding a newline (%0A), which
    # would get werkzeug's HTML 404: every path is the registry's to answer, with JSON errors.
    flask.current_app.register_error_handler(NotFound, lambda _: registry(flask.request))
