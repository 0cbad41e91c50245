import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
application = get_wsgi_application()

# Django imports the URLconf (and with it every view module, the API routers and
# their pydantic schemas) on the first request. Do it now, so each
# gunicorn worker is ready before it takes traffic instead of making one unlucky
# request wait for the imports.
from django.urls import get_resolver  # noqa: E402

get_resolver().url_patterns

# Everything loaded so far lives as long as the worker: move it out of the cyclic
# garbage collector's reach (gc.freeze), so a full collection walks what requests
# allocate (a few thousand objects), not the ~120k of Django, the app and its
# imports, which would otherwise stall an unlucky request now and then.
import gc  # noqa: E402

gc.freeze()
