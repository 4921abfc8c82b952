"""What people do with a collection after search: its duplicates (:mod:`deepfeat.collection.duplicates`)."""
