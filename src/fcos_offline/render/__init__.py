"""Pages and pictures: self-contained HTML reports (``html.py``), used by run, compare and tune."""
