"""The gateway's FastAPI application: its state, error handlers and routes."""

from __future__ import annotations

from fastapi import FastAPI

from mii.rpc.http import mii_routes, openai_routes, responses_route, tokenize_routes
from mii.rpc.http.auth import install_access_control
from mii.rpc.http.errors import install_error_handlers
from mii.rpc.http.request_id import EchoRequestId
from mii.rpc.http.state import GatewayState


def build_app(state: GatewayState, echo_request_id: bool = True) -> FastAPI:
    """The application serving ``state``'s deployment (no interactive docs pages).
    ``echo_request_id``: off behind Ray Serve's proxy, which echoes ``X-Request-Id``
    itself (the answer carried it twice)."""
    app = FastAPI(title=f"mii: {state.deployment_name}", docs_url=None, redoc_url=None)
    app.state.mii = state
    install_error_handlers(app)
    install_access_control(app, state.access)
    if echo_request_id:  # outermost: refusals by the access rules echo it too
        app.add_middleware(EchoRequestId)
    app.include_router(mii_routes.router)
    app.include_router(openai_routes.router)
    app.include_router(responses_route.router)
    app.include_router(tokenize_routes.router)
    return app
