"""CaraServe services: one package per process (see ../shared/DESIGN.md, "Processes")."""
