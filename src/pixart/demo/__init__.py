"""The bundled demo: a procedural "shapes" dataset (:mod:`.shapes`) and a prompt-following checker (:mod:`.checker`)."""
