"""The Gradio workbench: one module per tab, plain-function handlers over the core.

``workbench.ui.app.build_app`` builds the page; nothing here imports gradio or loads a
model at import time. The UI never does model surgery itself: it calls ``workbench``.
"""
