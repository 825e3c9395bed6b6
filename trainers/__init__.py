"""Sandbox-side training: the run manifest in, result.json + checkpoint + MLflow store out.

Never imports the host (`runner`) or a database driver; `manifest`, `data.fetch`,
`data.load` and `scgpt.tokenize` stay free of torch so the host can import them.
"""
