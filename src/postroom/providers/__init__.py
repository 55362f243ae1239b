"""Providers: one module per way out (SMTP, HTTP APIs, local capture); router.py picks among them."""
