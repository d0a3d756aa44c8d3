"""The built-in models: tiny, tiny-xl and demo (built in code or shipped), and the SD v1.4 and SDXL base
configurations."""
