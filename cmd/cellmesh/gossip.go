package main

import (
	"flag"
	"fmt"
	"io"

	"github.com/cellmesh/cellmesh/failover"
)

func runGossipKey(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("gossip-key", "cellmesh gossip-key > gossip.key",
		`Prints a new random gossip key (32 bytes, base64): a keyring file holds
one key per line, the first encrypts and every line decrypts.

Rotating the key of a running pool takes three steps, each written to
every member's key file (the file is re-read every reload interval and on
SIGHUP) before the next:
  1. install: NEW below OLD (both decrypt, OLD still encrypts);
  2. switch:  NEW above OLD (NEW encrypts);
  3. remove:  NEW alone.`, stderr)
	if code, done := parse(fs, args, stdout); done {
		return code
	}
	if fs.NArg() > 0 {
		return usagef(stderr, "gossip-key", "unexpected argument %q", fs.Arg(0))
	}
	fmt.Fprintln(stdout, failover.NewKey())
	return exitOK
}

// gossipFlags are the control plane's gossip flags.
type gossipFlags struct {
	bind, advertise, profile, keyFile *string
	join                              listFlag
}

func addGossipFlags(fs *flag.FlagSet) *gossipFlags {
	g := &gossipFlags{
		bind:      fs.String("gossip", "", "gossip address (ip:port, UDP and TCP); empty: no gossip"),
		advertise: fs.String("gossip-advertise", "", "gossip address other members reach, when not --gossip"),
		profile:   fs.String("gossip-profile", "lan", "gossip timings: lan, wan or fast"),
		keyFile:   fs.String("gossip-key-file", "", "gossip keyring file (cellmesh gossip-key), re-read on SIGHUP; required with --gossip unless --insecure-dev"),
	}
	fs.Var(&g.join, "gossip-join", "gossip address of a member to join through (repeatable or comma-separated)")
	return g
}

// config returns the member's configuration, nil without --gossip.
func (g *gossipFlags) config(insecure bool) (*failover.Config, error) {
	if *g.bind == "" {
		if *g.keyFile != "" || len(g.join) > 0 {
			return nil, fmt.Errorf("--gossip-key-file and --gossip-join need --gossip")
		}
		return nil, nil
	}
	p, err := failover.ParseProfile(*g.profile)
	if err != nil {
		return nil, err
	}
	c := &failover.Config{Bind: *g.bind, Advertise: *g.advertise, Join: g.join, Profile: p, Insecure: insecure && *g.keyFile == ""}
	if *g.keyFile != "" {
		if c.Keys, err = failover.ReadKeyFile(*g.keyFile); err != nil {
			return nil, err
		}
	}
	return c, nil
}
