"""``nuclei-seg segment``: whole folders of images, in-process, on a running service, or on Dask.

One image at a time reads top to bottom: ``inputs`` (find the images, give each a unique output
name) -> ``engines`` (segment it: here, on a server, or on a Dask worker) -> ``outputs`` (write its
files atomically, and the record that makes a re-run skip it) -> ``run`` (progress, stop, summary).
"""
