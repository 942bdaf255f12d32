"""The HTTP routes, one module per API area; :func:`coserve_jax.serve.app.create_app` includes
every ``router``."""

from coserve_jax.serve.routes import adapters, chat, completions, files, fine_tuning, models, tinker, tokenize

ROUTERS = (
    models.router, completions.router, chat.router, files.router, fine_tuning.router, adapters.router, tokenize.router,
    tinker.router,
)
