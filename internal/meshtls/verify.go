package meshtls

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"time"
)

// Reason says why a peer was refused. The values are few and fixed, fit
// for a metric label.
type Reason string

// Reasons of a VerifyError.
const (
	// ReasonNoCertificate: the peer sent no certificate.
	ReasonNoCertificate Reason = "no-certificate"
	// ReasonUnknownCA: the certificate does not chain to a CA of the bundle.
	ReasonUnknownCA Reason = "unknown-ca"
	// ReasonExpired: the certificate, or the CA that signed it, has expired
	// or is not valid yet.
	ReasonExpired Reason = "expired"
	// ReasonBadCertificate: the certificate chains to a trusted CA but may
	// not be used this way (extended key usage) or is otherwise unusable.
	ReasonBadCertificate Reason = "bad-certificate"
	// ReasonNoIdentity: the certificate carries no valid ID.
	ReasonNoIdentity Reason = "no-identity"
	// ReasonTrustDomain: the ID is of another trust domain than ours.
	ReasonTrustDomain Reason = "wrong-trust-domain"
	// ReasonUnauthorized: the caller's authorize (server) or expect (client)
	// refused the ID.
	ReasonUnauthorized Reason = "unauthorized"
)

// VerifyError is why a peer was refused in a handshake.
type VerifyError struct {
	Reason Reason
	// Peer is the ID the certificate carries, when it carries a valid one.
	// For ReasonUnknownCA, ReasonExpired and ReasonBadCertificate it is
	// what the certificate claims, not verified.
	Peer string
	// Err is the detail: what was wrong.
	Err error

	msg string // headline; empty means one made from Reason
}

func (e *VerifyError) Error() string {
	msg := e.msg
	if msg == "" {
		msg = "peer refused: " + string(e.Reason)
	}
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	if e.Peer != "" {
		msg += " (peer " + e.Peer + ")"
	}
	return msg
}

func (e *VerifyError) Unwrap() error { return e.Err }

// unknownRemote names a peer whose address is not known.
const unknownRemote = "unknown"

// ServerConfig returns a new TLS 1.3 server configuration that presents the
// Store's certificate as it is at each handshake and requires a client
// certificate, which it verifies as VerifyPeer does: it chains to a CA of
// the Store's bundle as it is at the handshake, with extended key usage
// ClientAuth; its ID is in the Store's trust domain; and authorize (nil
// accepts any such ID) accepts it. authorize must be safe for concurrent
// use. Verification runs in VerifyConnection, so resumed sessions are
// checked again too.
//
// onReject, when not nil, is called with the client's address and the
// *VerifyError of each client refused by this verification, so the caller
// can log or count it; it must not block. A client that sends no
// certificate at all is refused by crypto/tls itself, before onReject.
//
// The address comes through GetConfigForClient (crypto/tls and quic-go
// both call it), which derives each connection's configuration from this
// very *tls.Config at the handshake: set NextProtos and the like on it
// before use, not on a Clone, and call ServerConfig again for a variant.
func (s *Store) ServerConfig(authorize func(peer ID) error, onReject func(remote string, err error)) *tls.Config {
	cfg := &tls.Config{
		MinVersion:     tls.VersionTLS13,
		ClientAuth:     tls.RequireAnyClientCert,
		GetCertificate: s.getCertificate,
	}
	verify := func(remote string) func(tls.ConnectionState) error {
		return func(cs tls.ConnectionState) error {
			if err := s.verifyPeer(cs.PeerCertificates, x509.ExtKeyUsageClientAuth, authorize); err != nil {
				if onReject != nil {
					onReject(remote, err)
				}
				return err
			}
			return nil
		}
	}
	// VerifyConnection runs on every handshake, resumed ones included, so
	// a resumed session is checked against the bundle and clock of now. The
	// remote is known only through GetConfigForClient below.
	cfg.VerifyConnection = verify(unknownRemote)
	cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		remote := unknownRemote
		if hello != nil && hello.Conn != nil {
			if a := hello.Conn.RemoteAddr(); a != nil {
				remote = a.String()
			}
		}
		// Set up the session ticket keys before cloning so every
		// connection shares them (golang/go#60506).
		_, _ = cfg.DecryptTicket(nil, tls.ConnectionState{})
		c := cfg.Clone()
		c.GetConfigForClient = nil
		c.VerifyConnection = verify(remote)
		return c, nil
	}
	return cfg
}

// ClientConfig returns a new TLS 1.3 client configuration that presents the
// Store's certificate as it is at each handshake and verifies the server
// itself (InsecureSkipVerify only turns off crypto/tls's host name check,
// which mesh identities replace): the certificate chains to a CA of the
// Store's bundle as it is at the handshake, with extended key usage
// ServerAuth; its ID is in the Store's trust domain; and expect (nil
// accepts any such ID) accepts it. expect must be safe for concurrent use.
//
// onReject, when not nil, is called with the server name of the connection
// (or "unknown": crypto/tls sends no name for an IP address) and the
// *VerifyError of each server refused; it must not block. The handshake
// returns the same error.
func (s *Store) ClientConfig(expect func(peer ID) error, onReject func(remote string, err error)) *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS13,
		InsecureSkipVerify:   true, // verified by VerifyConnection below
		GetClientCertificate: s.getClientCertificate,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if err := s.verifyPeer(cs.PeerCertificates, x509.ExtKeyUsageServerAuth, expect); err != nil {
				if onReject != nil {
					remote := cs.ServerName
					if remote == "" {
						remote = unknownRemote
					}
					onReject(remote, err)
				}
				return err
			}
			return nil
		},
	}
}

func (s *Store) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return &s.cur.Load().cert, nil
}

func (s *Store) getClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return &s.cur.Load().cert, nil
}

// VerifyPeer checks a peer's certificate chain (leaf first) the way the
// Store's TLS configurations do, for a peer of the given extended key usage
// (x509.ExtKeyUsageClientAuth for a client, ServerAuth for a server), and
// returns its ID. check, when not nil, decides whether the ID is welcome.
// Errors are *VerifyError.
func (s *Store) VerifyPeer(certs []*x509.Certificate, usage x509.ExtKeyUsage, check func(peer ID) error) (ID, error) {
	if err := s.verifyPeer(certs, usage, check); err != nil {
		return ID{}, err
	}
	return PeerID(certs)
}

// verifyPeer returns nil or a *VerifyError, never a typed nil.
func (s *Store) verifyPeer(certs []*x509.Certificate, usage x509.ExtKeyUsage, check func(peer ID) error) error {
	m := s.cur.Load()
	now := s.now()
	if len(certs) == 0 {
		return &VerifyError{Reason: ReasonNoCertificate, msg: "peer sent no certificate",
			Err: errors.New("mutual TLS needs a certificate from the mesh CA")}
	}
	leaf := certs[0]
	claimed := ""
	if id, err := PeerID(certs); err == nil {
		claimed = id.String()
	}
	switch {
	case now.Before(leaf.NotBefore):
		return &VerifyError{Reason: ReasonExpired, Peer: claimed,
			msg: "peer certificate is not valid before " + formatTime(leaf.NotBefore),
			Err: fmt.Errorf("now is %s", formatTime(now))}
	case now.After(leaf.NotAfter):
		return &VerifyError{Reason: ReasonExpired, Peer: claimed,
			msg: "peer certificate expired at " + formatTime(leaf.NotAfter),
			Err: fmt.Errorf("now is %s", formatTime(now))}
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{
		Roots:         m.roots,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{usage},
	})
	if err != nil {
		return chainError(err, leaf, m.cas, now, claimed)
	}
	id, err := PeerID(certs)
	if err != nil {
		return &VerifyError{Reason: ReasonNoIdentity, msg: "peer certificate has no valid cellmesh identity", Err: err}
	}
	if own := m.id.TrustDomain; id.TrustDomain != own {
		return &VerifyError{Reason: ReasonTrustDomain, Peer: id.String(),
			msg: fmt.Sprintf("peer is in trust domain %q", id.TrustDomain),
			Err: fmt.Errorf("want %q", own)}
	}
	if check != nil {
		if err := check(id); err != nil {
			return &VerifyError{Reason: ReasonUnauthorized, Peer: id.String(), msg: "peer is not authorized", Err: err}
		}
	}
	return nil
}

// chainError explains a failed chain verification.
func chainError(err error, leaf *x509.Certificate, cas []*x509.Certificate, now time.Time, claimed string) error {
	var invalid x509.CertificateInvalidError
	if errors.As(err, &invalid) {
		switch invalid.Reason {
		case x509.Expired:
			if c := invalid.Cert; c != nil && c != leaf {
				return caExpired(c, now, claimed)
			}
			return &VerifyError{Reason: ReasonExpired, Peer: claimed, msg: "peer certificate is expired or not yet valid", Err: err}
		case x509.IncompatibleUsage:
			return &VerifyError{Reason: ReasonBadCertificate, Peer: claimed, msg: "peer certificate may not be used for this side of TLS", Err: err}
		}
	}
	var unknown x509.UnknownAuthorityError
	if errors.As(err, &unknown) {
		// A CA of the bundle that signed the leaf but is out of its
		// validity: x509 reports it as unknown; say what it is.
		for _, ca := range cas {
			if leaf.CheckSignatureFrom(ca) != nil {
				continue
			}
			if now.After(ca.NotAfter) || now.Before(ca.NotBefore) {
				return caExpired(ca, now, claimed)
			}
		}
		return &VerifyError{Reason: ReasonUnknownCA, Peer: claimed, msg: "peer certificate is not signed by a trusted mesh CA", Err: err}
	}
	return &VerifyError{Reason: ReasonBadCertificate, Peer: claimed, msg: "peer certificate does not verify", Err: err}
}

// caExpired explains a CA certificate of the peer's chain out of its
// validity.
func caExpired(ca *x509.Certificate, now time.Time, claimed string) *VerifyError {
	msg := fmt.Sprintf("mesh CA %q of the peer certificate expired at %s", ca.Subject.CommonName, formatTime(ca.NotAfter))
	if now.Before(ca.NotBefore) {
		msg = fmt.Sprintf("mesh CA %q of the peer certificate is not valid before %s", ca.Subject.CommonName, formatTime(ca.NotBefore))
	}
	return &VerifyError{Reason: ReasonExpired, Peer: claimed, msg: msg, Err: fmt.Errorf("now is %s", formatTime(now))}
}
