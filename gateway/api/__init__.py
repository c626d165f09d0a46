"""The HTTP edge: errors, wire types, the route table and its OpenAPI document, one module per resource."""
