// Package meshtls owns the mutual TLS of the mesh: workload identities (ID,
// a SPIFFE-style URI carried as the one URI SAN of a certificate), making a
// mesh CA and issuing workload certificates (NewCA, Issue), and a Store that
// holds a workload's CA bundle, certificate and key, reloads them when the
// files change, and builds the crypto/tls configurations that sidecars use
// on both ends of a connection (ServerConfig, ClientConfig).
//
// Peers are verified by this package, not by crypto/tls's hostname check:
// the peer certificate must chain to a CA of the bundle loaded at handshake
// time, carry exactly one valid ID in the Store's trust domain, and pass the
// caller's authorization. Every refusal is a *VerifyError with a Reason fit
// for a metric label.
//
// meshtls uses the standard library's crypto only. It must not import another
// cellmesh package, start goroutines of its own (Watch runs on the caller's),
// export metrics, or log anywhere but in Watch, which reports to the logger it
// is given. Certificates, keys and the CA bundle are read from files; nothing
// is fetched over the network.
package meshtls
