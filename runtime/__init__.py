"""Device side: runs exported dual graphs (numpy + one backend; never imports torch by itself)."""
