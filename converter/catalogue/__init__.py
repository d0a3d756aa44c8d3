"""Catalogues: many models x variants converted and validated as Ray tasks, on this machine or a cluster.

`plan` reads the catalogue file and plans each package's tasks, `reservations` says how much memory each
task reserves, `tasks` is what a task runs (the converter's own conversion), `run` drives Ray, and `index`
keeps `catalogue.json`, what is finished and what failed.
"""
