"""`qwen15 serve`: an OpenAI-compatible HTTP server over the continuous-batching engine, and a chat page.

protocol.py  request bodies -> validated generation requests, and the OpenAI-shaped responses and errors
runner.py    the engine in its own thread, events handed to the HTTP handlers; tensor-parallel followers
metrics.py   the Prometheus text of /metrics
app.py       the FastAPI application: routes, auth, body limit, SSE streaming, disconnects
static/chat.html  the chat page served at / (one file, no build step, works offline)

Needs the `serve` extra (FastAPI, uvicorn); nothing here is imported by the rest of the package.
"""
