"""Serve the workbench: ``python app.py`` (host/port via GRADIO_SERVER_NAME / GRADIO_SERVER_PORT)."""

import sys

if __name__ == "__main__":
    print(
        "The Gradio workbench is not built yet; use the CLI meanwhile: python -m workbench --help",
        file=sys.stderr,
    )
    sys.exit(1)
