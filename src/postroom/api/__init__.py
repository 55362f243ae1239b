"""The HTTP door: FastAPI app factory, routes, request/response shapes, auth."""
