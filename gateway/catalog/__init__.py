"""Live item changes over the snapshot's catalog: records, the view a node serves, following the changes."""
