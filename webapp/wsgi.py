import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
application = get_wsgi_application()

# Django imports the URLconf (and with it every view module, the API routers and
# their pydantic schemas: ~0.3 s of CPU) on the first request. Do it now, so each
# gunicorn worker is ready before it takes traffic instead of making one unlucky
# request wait for the imports.
from django.urls import get_resolver  # noqa: E402

get_resolver().url_patterns
