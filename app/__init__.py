"""The asyncfgd-app command line."""
