"""Example configs and data shipped with the package (``bamba.demo.packaged_config``)."""
