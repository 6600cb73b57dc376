"""Stage 5, the verdict: ``evaluate`` runs models side by side; metrics, answer quality, rendering
and plots of the report."""
