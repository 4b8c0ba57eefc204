// Package clienv finds the server address and the bearer token the way the
// runservice CLI does (runservice/cli.py), for the example programs in cmd/.
package clienv

import (
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
)

// DefaultAddr is the address of a development server (`make run`).
const DefaultAddr = "127.0.0.1:50051"

// Addr is RUNSERVICE_ADDR, else DefaultAddr.
func Addr() string {
	if addr := os.Getenv("RUNSERVICE_ADDR"); addr != "" {
		return addr
	}
	return DefaultAddr
}

// Token is RUNSERVICE_TOKEN; else, when addr is on loopback, the development
// token in DataDir()/dev-token (surrounding whitespace trimmed); else "". A
// missing dev-token file is no error; an unreadable one is.
func Token(addr string) (string, error) {
	if token := os.Getenv("RUNSERVICE_TOKEN"); token != "" {
		return token, nil
	}
	if !IsLoopback(addr) {
		return "", nil
	}
	dir, err := DataDir()
	if err != nil {
		return "", err
	}
	data, err := os.ReadFile(filepath.Join(dir, "dev-token"))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(data)), nil
}

// DataDir is RUNSERVICE_HOME, else ~/.local/share/runservice: where a server
// started with --dev-token writes the development token.
func DataDir() (string, error) {
	if home := os.Getenv("RUNSERVICE_HOME"); home != "" {
		return home, nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(home, ".local", "share", "runservice"), nil
}

// IsLoopback reports whether addr (HOST:PORT) names a loopback host:
// localhost, 127.0.0.0/8 or ::1 (bracketed or not).
func IsLoopback(addr string) bool {
	host := addr
	if i := strings.LastIndex(addr, ":"); i >= 0 {
		host = addr[:i]
	}
	host = strings.Trim(host, "[]")
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
