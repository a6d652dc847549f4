"""Operating the node: health and metrics, status, admin actions, dashboard, retention, reconciliation."""
