"""`coreml-sd serve`: AUTOMATIC1111's web API and a web page over the runtime's Pipeline (needs the `serve` extra).

app.py holds the routes, queue.py the one-at-a-time worker, schemas.py A1111's request and response bodies,
translation.py the mapping between them and the pipeline's calls, codec.py images in and out, packages.py the
models on offer, command.py the command line; static/ is the page.
"""
