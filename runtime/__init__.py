"""Device side: runs exported dual graphs (numpy + one backend; never imports torch by itself).

Imports flow one way: the exporter and the app import the runtime, never the reverse."""
