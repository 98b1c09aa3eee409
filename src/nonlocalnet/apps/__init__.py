"""Applications built on the library: the built-in demo.

Rooms: ``apps`` may import ``engine``, ``models``, ``data`` and ``viz``; only ``cli`` imports
``apps``.
"""
