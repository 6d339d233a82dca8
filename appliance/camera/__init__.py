"""Camera sources: where frames come from (a replayed folder, a GenICam device)."""
