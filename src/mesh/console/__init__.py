"""The web console under ``/console``: server-rendered pages for customers and operators.

Layout: ``web`` is the plumbing (sessions, CSRF, rendering, security headers) every page
goes through; one module per area holds its routes (``auth_routes``, ``dashboard``,
``billing`` + ``payments``, ``keys``, ``guide``, ``playground``, ``operator`` +
``operator_fleet``); ``routes.console_routes(settings)`` assembles them for the app.
Templates are Jinja2 (``templates/``), styles and the little JavaScript there is are in
``static/`` (no CDN, no build step); charts are SVG drawn on the server (``charts``).

* Sessions are server-side rows (``sessions``): the cookie holds a random token, the
  database its hash; signing out or changing the password ends sessions everywhere.
* CSRF: every POST carries the session's token (signed-out forms: an HMAC of a cookie).
* Money is only ever credited by a verified payment webhook (``payments``).
* The playground calls the public API in-process with a per-user key derived from the
  console secret, so the browser never holds a key (``playground``).

Keep this package's ``__init__`` free of imports: the Alembic environment imports
``mesh.console.tables`` and must not pull the web stack in with it.
"""
