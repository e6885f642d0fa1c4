"""Vendored go-plugin protocol stubs (controller, stdio, health); regenerate with regen.sh."""
