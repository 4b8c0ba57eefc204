package clienv

import (
	"os"
	"path/filepath"
	"testing"
)

// devHome points RUNSERVICE_HOME at a temporary directory holding a dev-token
// file with contents, and unsets RUNSERVICE_TOKEN.
func devHome(t *testing.T, contents string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "dev-token"), []byte(contents), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("RUNSERVICE_HOME", dir)
	t.Setenv("RUNSERVICE_TOKEN", "")
	return dir
}

func TestTokenPrefersRunserviceToken(t *testing.T) {
	devHome(t, "dev-secret\n")
	t.Setenv("RUNSERVICE_TOKEN", "env-secret")
	got, err := Token("127.0.0.1:50051")
	if err != nil || got != "env-secret" {
		t.Fatalf("Token = %q, %v; want the RUNSERVICE_TOKEN value", got, err)
	}
}

func TestTokenReadsTheDevTokenOnLoopback(t *testing.T) {
	devHome(t, "  dev-secret\n")
	for _, addr := range []string{"127.0.0.1:50051", "localhost:50051", "[::1]:50051", "127.0.0.2:1", "127.0.0.1"} {
		got, err := Token(addr)
		if err != nil || got != "dev-secret" {
			t.Errorf("Token(%q) = %q, %v; want the dev token, trimmed", addr, got, err)
		}
	}
}

func TestTokenIgnoresTheDevTokenElsewhere(t *testing.T) {
	devHome(t, "dev-secret")
	for _, addr := range []string{"10.0.0.1:50051", "example.com:50051", "[::2]:50051"} {
		got, err := Token(addr)
		if err != nil || got != "" {
			t.Errorf("Token(%q) = %q, %v; want no token off loopback", addr, got, err)
		}
	}
}

func TestTokenWithoutADevTokenFileIsEmpty(t *testing.T) {
	t.Setenv("RUNSERVICE_HOME", t.TempDir())
	t.Setenv("RUNSERVICE_TOKEN", "")
	got, err := Token("127.0.0.1:50051")
	if err != nil || got != "" {
		t.Fatalf("Token = %q, %v; want no token and no error", got, err)
	}
}

func TestDataDirDefaultsToTheXDGDataPath(t *testing.T) {
	t.Setenv("RUNSERVICE_HOME", "")
	t.Setenv("HOME", "/home/someone")
	got, err := DataDir()
	if want := "/home/someone/.local/share/runservice"; err != nil || got != want {
		t.Fatalf("DataDir = %q, %v; want %q", got, err, want)
	}
}

func TestAddrDefaultsToTheDevelopmentServer(t *testing.T) {
	t.Setenv("RUNSERVICE_ADDR", "")
	if got := Addr(); got != DefaultAddr {
		t.Fatalf("Addr = %q; want %q", got, DefaultAddr)
	}
	t.Setenv("RUNSERVICE_ADDR", "10.1.2.3:9")
	if got := Addr(); got != "10.1.2.3:9" {
		t.Fatalf("Addr = %q; want RUNSERVICE_ADDR", got)
	}
}
