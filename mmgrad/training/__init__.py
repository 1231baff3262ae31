"""The thin training API: multi-view data (``data``), I2M2-style models whose losses and
parameter groups feed a ``FusedCalibrator`` (``models``), and ``fit``/``evaluate`` (``train``)."""
