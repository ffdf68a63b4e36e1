"""Who may do what: identities (users and service principals), their credentials, and permissions.

`permissions` holds the pure rules (levels, ACL parsing, what a caller may do), `oauth` the signed
short-lived access tokens of service principals, `scim` the SCIM documents. The store keeps the
state; `berth.control.access` is the control-plane service over it and `berth.gateway.auth` the
hot-path check.
"""
