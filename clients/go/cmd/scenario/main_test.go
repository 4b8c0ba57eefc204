package main

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestHelpNeverShowsTheToken(t *testing.T) {
	home := t.TempDir()
	if err := os.WriteFile(filepath.Join(home, "dev-token"), []byte("dev-secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("RUNSERVICE_HOME", home)
	t.Setenv("RUNSERVICE_TOKEN", "env-secret")
	var out strings.Builder
	_, err := parseArgs([]string{"--help"}, &out)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("parseArgs(--help) = %v; want flag.ErrHelp", err)
	}
	help := out.String()
	if strings.Contains(help, "secret") {
		t.Fatalf("--help shows a token:\n%s", help)
	}
	if !strings.Contains(help, "(from RUNSERVICE_TOKEN or the dev token)") {
		t.Fatalf("--help does not say where the token comes from:\n%s", help)
	}
}

func TestTokenFlagIsEmptyUnlessGiven(t *testing.T) {
	t.Setenv("RUNSERVICE_TOKEN", "env-secret")
	a, err := parseArgs([]string{"--scenario", "live"}, &strings.Builder{})
	if err != nil || a.token != "" || a.addr != "127.0.0.1:50051" {
		t.Fatalf("parseArgs = %+v, %v; want no token (looked up later) and the default address", a, err)
	}
	a, err = parseArgs([]string{"--scenario", "replay", "--token", "given"}, &strings.Builder{})
	if err != nil || a.token != "given" {
		t.Fatalf("parseArgs = %+v, %v; want the --token value", a, err)
	}
}
