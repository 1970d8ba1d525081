package main

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/cellmesh/cellmesh/internal/meshtls"
)

func TestCertsHelp(t *testing.T) {
	tests := []struct {
		name  string
		args  []string
		usage string
		flags []string
	}{
		{"certs", []string{"certs", "--help"}, "Usage: cellmesh certs <init|issue> [flags]", nil},
		{"certs-h", []string{"certs", "-h"}, "Usage: cellmesh certs <init|issue> [flags]", nil},
		{"certs-help-word", []string{"certs", "help"}, "Usage: cellmesh certs <init|issue> [flags]", nil},
		{"init", []string{"certs", "init", "--help"}, "Usage: cellmesh certs init --dir DIR --trust-domain TD",
			[]string{"-dir", "-trust-domain", "-days"}},
		{"init-h-after-flags", []string{"certs", "init", "--dir", "x", "-h"}, "Usage: cellmesh certs init", nil},
		{"issue", []string{"certs", "issue", "--help"}, "Usage: cellmesh certs issue --dir DIR --region R --unit U --service S",
			[]string{"-dir", "-region", "-unit", "-service", "-host", "-days", "-name"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, tt.args...)
			wantRun(t, r, exitOK, []string{tt.usage}, nil)
			if r.stderr != "" {
				t.Errorf("help wrote to stderr:\n%s", r)
			}
			for _, f := range tt.flags {
				if !strings.Contains(r.stdout, "  "+f+" ") && !strings.Contains(r.stdout, "  "+f+"\n") {
					t.Errorf("help does not list flag %s\n%s", f, r)
				}
			}
		})
	}
	if r := runCLI(t, "--help"); !strings.Contains(r.stdout, "  certs ") {
		t.Errorf("cellmesh --help does not list certs\n%s", r)
	}
}

// listDir returns the names and modes of a directory's files, or nil when
// it does not exist.
func listDir(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		info, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, e.Name()+" "+info.Mode().Perm().String())
	}
	return out
}

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		t.Fatalf("%s holds no PEM", path)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestCertsInitIssueLoad(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	r := runCLI(t, "certs", "init", "--dir", dir, "--trust-domain", "cellmesh.test")
	wantRun(t, r, exitOK, []string{"wrote " + filepath.Join(dir, "ca.pem"), "trust domain cellmesh.test", "wrote " + filepath.Join(dir, "ca-key.pem")}, nil)
	info, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if perm := info.Mode().Perm(); perm != 0o700 {
		t.Errorf("--dir mode %v, want 0700", perm)
	}
	if diff := cmp.Diff([]string{"ca-key.pem -rw-------", "ca.pem -rw-r--r--"}, listDir(t, dir)); diff != "" {
		t.Errorf("files after init (-want +got):\n%s", diff)
	}
	ca := readCert(t, filepath.Join(dir, "ca.pem"))
	if !ca.IsCA || ca.Subject.CommonName != "cellmesh mesh CA cellmesh.test" {
		t.Errorf("ca.pem holds %q, IsCA %v", ca.Subject.CommonName, ca.IsCA)
	}
	if d := time.Until(ca.NotAfter); d < 364*day || d > 366*day {
		t.Errorf("CA valid for %v, want the default 365 days", d)
	}

	r = runCLI(t, "certs", "issue", "--dir", dir, "--region", "us-east", "--unit", "u1", "--service", "ledger")
	id := "spiffe://cellmesh.test/region/us-east/unit/u1/service/ledger"
	wantRun(t, r, exitOK, []string{id, "expires", "wrote " + filepath.Join(dir, "u1-ledger.pem"), "wrote " + filepath.Join(dir, "u1-ledger-key.pem")}, nil)
	wantFiles := []string{"ca-key.pem -rw-------", "ca.pem -rw-r--r--", "u1-ledger-key.pem -rw-------", "u1-ledger.pem -rw-r--r--"}
	if diff := cmp.Diff(wantFiles, listDir(t, dir)); diff != "" {
		t.Errorf("files after issue (-want +got):\n%s", diff)
	}
	files := meshtls.Files{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, "u1-ledger.pem"), Key: filepath.Join(dir, "u1-ledger-key.pem")}
	st, err := meshtls.Load(files, nil)
	if err != nil {
		t.Fatalf("Load of what certs wrote: %v", err)
	}
	if st.ID().String() != id {
		t.Errorf("loaded identity %s, want %s", st.ID(), id)
	}
	leaf := st.Leaf()
	var ips []string
	for _, ip := range leaf.IPAddresses {
		ips = append(ips, ip.String())
	}
	if !slices.Equal(ips, []string{"127.0.0.1"}) || !slices.Equal(leaf.DNSNames, []string{"localhost"}) {
		t.Errorf("default hosts: IPs %v, DNS %v; want 127.0.0.1 and localhost", ips, leaf.DNSNames)
	}
	if d := time.Until(leaf.NotAfter); d < 29*day || d > 31*day {
		t.Errorf("certificate valid for %v, want the default 30 days", d)
	}
	if !strings.Contains(r.stdout, leaf.NotAfter.UTC().Format(time.RFC3339)) || strings.Contains(r.stdout, "cut to") {
		t.Errorf("output does not give the expiry %v (uncut)\n%s", leaf.NotAfter, r)
	}

	// Issuing again replaces the pair; a Store reloads it.
	r = runCLI(t, "certs", "issue", "--dir", dir, "--region", "us-east", "--unit", "u1", "--service", "ledger")
	wantRun(t, r, exitOK, []string{id}, nil)
	if err := st.Reload(); err != nil {
		t.Fatalf("Reload after a new issue: %v", err)
	}
	if st.Leaf().SerialNumber.Cmp(leaf.SerialNumber) == 0 {
		t.Error("the second issue did not replace the certificate")
	}
	if diff := cmp.Diff(wantFiles, listDir(t, dir)); diff != "" {
		t.Errorf("files after a second issue, no temporary left (-want +got):\n%s", diff)
	}

	// --name, --host (repeated and comma-separated) and --days beyond the CA.
	r = runCLI(t, "certs", "issue", "--dir", dir, "--region", "eu-west", "--unit", "u2", "--service", "gateway",
		"--name", "gw", "--host", "10.0.0.7,gw.internal", "--host", "::1", "--days", "1000")
	wantRun(t, r, exitOK, []string{"spiffe://cellmesh.test/region/eu-west/unit/u2/service/gateway", "10.0.0.7, gw.internal, ::1", "cut to the CA's expiry", "gw.pem", "gw-key.pem"}, nil)
	gw := readCert(t, filepath.Join(dir, "gw.pem"))
	if !gw.NotAfter.Equal(ca.NotAfter) {
		t.Errorf("NotAfter %v, want the CA's %v", gw.NotAfter, ca.NotAfter)
	}
	if len(gw.IPAddresses) != 2 || !slices.Equal(gw.DNSNames, []string{"gw.internal"}) {
		t.Errorf("hosts: IPs %v, DNS %v", gw.IPAddresses, gw.DNSNames)
	}
	if _, err := meshtls.Load(meshtls.Files{CA: files.CA, Cert: filepath.Join(dir, "gw.pem"), Key: filepath.Join(dir, "gw-key.pem")}, nil); err != nil {
		t.Errorf("Load gw: %v", err)
	}
}

func TestCertsInitRefusesOverwrite(t *testing.T) {
	dir := t.TempDir()
	wantRun(t, runCLI(t, "certs", "init", "--dir", dir, "--trust-domain", "cellmesh.test"), exitOK, nil, nil)
	before, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	r := runCLI(t, "certs", "init", "--dir", dir, "--trust-domain", "other.test")
	wantRun(t, r, exitError, nil, []string{"already exists", "pass a new --dir", "remove"})
	after, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, after) {
		t.Error("the CA was overwritten")
	}

	// Either file alone is enough to refuse.
	for _, keep := range []string{"ca.pem", "ca-key.pem"} {
		t.Run("only-"+keep, func(t *testing.T) {
			d := t.TempDir()
			if err := os.WriteFile(filepath.Join(d, keep), []byte("x"), 0o600); err != nil {
				t.Fatal(err)
			}
			r := runCLI(t, "certs", "init", "--dir", d, "--trust-domain", "cellmesh.test")
			wantRun(t, r, exitError, nil, []string{filepath.Join(d, keep) + " already exists"})
			if got := listDir(t, d); len(got) != 1 {
				t.Errorf("files %v, want only %s", got, keep)
			}
		})
	}
}

func TestCertsBadInput(t *testing.T) {
	ca := t.TempDir()
	wantRun(t, runCLI(t, "certs", "init", "--dir", ca, "--trust-domain", "cellmesh.test"), exitOK, nil, nil)
	issue := func(extra ...string) []string {
		return append([]string{"certs", "issue", "--dir", ca, "--region", "r", "--unit", "u", "--service", "s"}, extra...)
	}
	empty := "EMPTY" // replaced by a new empty directory
	tests := []struct {
		name      string
		args      []string
		code      int
		stderrHas []string
	}{
		{"no-subcommand", []string{"certs"}, exitUsage, []string{"Usage: cellmesh certs <init|issue>"}},
		{"unknown-subcommand", []string{"certs", "rotate"}, exitUsage, []string{`unknown subcommand "rotate"`}},
		{"init-unknown-flag", []string{"certs", "init", "--bogus"}, exitUsage, []string{"flag provided but not defined: -bogus", "Usage: cellmesh certs init"}},
		{"init-no-dir", []string{"certs", "init", "--trust-domain", "cellmesh.test"}, exitUsage, []string{"--dir is required"}},
		{"init-no-trust-domain", []string{"certs", "init", "--dir", empty}, exitUsage, []string{"--trust-domain is required"}},
		{"init-extra-argument", []string{"certs", "init", "--dir", empty, "--trust-domain", "t", "x"}, exitUsage, []string{`unexpected argument "x"`}},
		{"init-bad-trust-domain", []string{"certs", "init", "--dir", empty, "--trust-domain", "Mesh_Test"}, exitError, []string{"--trust-domain", `has character 'M'`}},
		{"init-zero-days", []string{"certs", "init", "--dir", empty, "--trust-domain", "t", "--days", "0"}, exitError, []string{"--days 0"}},
		{"init-huge-days", []string{"certs", "init", "--dir", empty, "--trust-domain", "t", "--days", "36501"}, exitError, []string{"--days 36501"}},
		{"init-bad-days", []string{"certs", "init", "--dir", empty, "--trust-domain", "t", "--days", "many"}, exitUsage, []string{`invalid value "many" for flag -days`}},
		{"issue-unknown-flag", issue("--bogus"), exitUsage, []string{"flag provided but not defined: -bogus"}},
		{"issue-no-dir", []string{"certs", "issue", "--region", "r", "--unit", "u", "--service", "s"}, exitUsage, []string{"--dir is required"}},
		{"issue-no-region", []string{"certs", "issue", "--dir", ca, "--unit", "u", "--service", "s"}, exitUsage, []string{"--region is required"}},
		{"issue-no-unit", []string{"certs", "issue", "--dir", ca, "--region", "r", "--service", "s"}, exitUsage, []string{"--unit is required"}},
		{"issue-no-service", []string{"certs", "issue", "--dir", ca, "--region", "r", "--unit", "u"}, exitUsage, []string{"--service is required"}},
		{"issue-extra-argument", issue("x"), exitUsage, []string{`unexpected argument "x"`}},
		{"issue-bad-unit", []string{"certs", "issue", "--dir", ca, "--region", "r", "--unit", "u/1", "--service", "s"}, exitError, []string{"--unit", `"u/1" has character '/'`}},
		{"issue-bad-region", []string{"certs", "issue", "--dir", ca, "--region", "..", "--unit", "u", "--service", "s"}, exitError, []string{"--region", `".." is not allowed`}},
		{"issue-bad-service", []string{"certs", "issue", "--dir", ca, "--region", "r", "--unit", "u", "--service", "a b"}, exitError, []string{"--service", `has character ' '`}},
		{"issue-too-long", []string{"certs", "issue", "--dir", ca, "--region", "r", "--unit", "u", "--service", strings.Repeat("s", 250), "--name", "x"}, exitError, []string{"at most 255"}},
		{"issue-bad-host", issue("--host", "bad host"), exitError, []string{`host "bad host"`}},
		{"issue-zoned-host", issue("--host", "fe80::1%eth0"), exitError, []string{"zone"}},
		{"issue-zero-days", issue("--days", "0"), exitError, []string{"--days 0: want a number of days from 1 to 36500"}},
		{"issue-huge-days", issue("--days", "999999999"), exitError, []string{"--days 999999999"}},
		{"issue-name-ca", issue("--name", "ca"), exitError, []string{"overwrite the CA's ca.pem"}},
		{"issue-name-ca-key", issue("--name", "ca-key"), exitError, []string{"overwrite the CA's ca-key.pem"}},
		{"issue-name-path", issue("--name", "../x"), exitError, []string{`--name "../x"`}},
		{"issue-name-hidden", issue("--name", ".x"), exitError, []string{"must not start with '.'"}},
		{"issue-missing-ca", []string{"certs", "issue", "--dir", empty, "--region", "r", "--unit", "u", "--service", "s"}, exitError, []string{"no mesh CA in", "cellmesh certs init --dir"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			args := slices.Clone(tt.args)
			for i, a := range args {
				if a == empty {
					args[i] = dir
				}
			}
			caBefore := listDir(t, ca)
			r := runCLI(t, args...)
			wantRun(t, r, tt.code, nil, tt.stderrHas)
			if r.stdout != "" {
				t.Errorf("wrote to stdout on failure:\n%s", r)
			}
			if got := listDir(t, dir); len(got) != 0 {
				t.Errorf("files written on failure: %v", got)
			}
			if diff := cmp.Diff(caBefore, listDir(t, ca)); diff != "" {
				t.Errorf("files written on failure (-before +after):\n%s", diff)
			}
		})
	}
}

func TestCertsIssueBrokenCA(t *testing.T) {
	dir := t.TempDir()
	wantRun(t, runCLI(t, "certs", "init", "--dir", dir, "--trust-domain", "cellmesh.test"), exitOK, nil, nil)
	if err := os.WriteFile(filepath.Join(dir, "ca-key.pem"), []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := runCLI(t, "certs", "issue", "--dir", dir, "--region", "r", "--unit", "u", "--service", "s")
	wantRun(t, r, exitError, nil, []string{filepath.Join(dir, "ca-key.pem"), "ca key", `no PEM "PRIVATE KEY" block`})
	if got := listDir(t, dir); len(got) != 2 {
		t.Errorf("files %v after a failed issue, want only the CA's", got)
	}
}
