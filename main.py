"""The Cloud Function: one HTTP entry point, `registry`, serving the registry pull API."""
import flask
import functions_framework
from werkzeug.wrappers import Request

from builder import server
from builder.config import Config
from builder.http import RegistryPerProcess

# Made at start-up, so a misconfiguration fails the deploy loudly.
_registry = RegistryPerProcess(Config.from_env())
server.configure(on_stop=_registry.shutdown)


@functions_framework.http
def registry(request):
    return _registry.get().handle(request)


def _wsgi(environ, start_response):
    """`registry` as a plain WSGI application: werkzeug's request and response, no Flask in between."""
    return registry(Request(environ))(environ, start_response)


if flask.has_app_context():  # functions-framework runs this module inside its app's context
    # Every request goes straight to the registry. Its catch-all route `/<path:path>` does not
    # match a path holding a newline (%0A), which would get werkzeug's HTML 404, and Flask's
    # routing and request context cost a warm manifest request a third of its time
    # (bench/RESULTS.md, "Warm manifests over the workers").
    flask.current_app.wsgi_app = _wsgi
