"""Serve the workbench: ``python app.py [--base toy] [--host 127.0.0.1] [--port 7860] [--space]``.

Host and port default to Gradio's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (127.0.0.1:7860).
"""

from workbench.ui.app import serve
from workbench.ui.settings import parse_args

if __name__ == "__main__":
    serve(parse_args())
