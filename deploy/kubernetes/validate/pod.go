package main

import (
	"errors"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

const (
	grpcPort = 50051
	// readinessService is the health service name that turns NOT_SERVING while the
	// server drains or its store takes no writes; "" stays SERVING then (liveness).
	readinessService = "runservice.v1.RunService"
	// The server's defaults (runservice serve --help) and the slack docs/operations.md
	// gives a shutdown beyond drain + stop grace.
	defaultDrain     = 30 * time.Second
	defaultStopGrace = 5 * time.Second
	shutdownSlack    = 3 * time.Second
)

// checkPod checks the pod template: one runservice container with its probes, secrets,
// resources and a locked-down security context, and a grace period that outlasts a drain.
func checkPod(spec corev1.PodSpec) []error {
	if len(spec.Containers) != 1 {
		return []error{errors.New("the pod template needs exactly one container")}
	}
	c := spec.Containers[0]
	errs := []error{
		checkProbe("readinessProbe", c.ReadinessProbe, readinessService),
		checkProbe("livenessProbe", c.LivenessProbe, ""),
		checkGrace(spec, c),
		checkDBSecret(c),
		checkSecurity(spec, c),
		checkMounts(spec, c),
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() {
		errs = append(errs, errors.New("the container needs cpu and memory requests"))
	}
	return errs
}

func checkProbe(name string, p *corev1.Probe, service string) error {
	if p == nil || p.GRPC == nil {
		return fmt.Errorf("the container needs a grpc %s", name)
	}
	got := ""
	if p.GRPC.Service != nil {
		got = *p.GRPC.Service
	}
	if got != service || p.GRPC.Port != grpcPort {
		return fmt.Errorf("the %s must ask port %d for service %q, not port %d for %q",
			name, grpcPort, service, p.GRPC.Port, got)
	}
	return nil
}

// checkGrace checks that the kubelet's SIGKILL comes after the longest orderly shutdown:
// drain timeout + stop grace + a few seconds (docs/operations.md, Shutdown).
func checkGrace(spec corev1.PodSpec, c corev1.Container) error {
	drain, err := envDuration(c, "RUNSERVICE_DRAIN_TIMEOUT", defaultDrain)
	if err != nil {
		return err
	}
	grace, err := envDuration(c, "RUNSERVICE_STOP_GRACE", defaultStopGrace)
	if err != nil {
		return err
	}
	need := drain + grace + shutdownSlack
	if spec.TerminationGracePeriodSeconds == nil ||
		time.Duration(*spec.TerminationGracePeriodSeconds)*time.Second <= need {
		return fmt.Errorf("terminationGracePeriodSeconds must exceed %s (drain %s + stop grace %s + %s)",
			need, drain, grace, shutdownSlack)
	}
	return nil
}

func envDuration(c corev1.Container, name string, fallback time.Duration) (time.Duration, error) {
	for _, e := range c.Env {
		if e.Name != name {
			continue
		}
		d, err := time.ParseDuration(e.Value)
		if err != nil {
			return 0, fmt.Errorf("%s: %w (write it as e.g. 30s)", name, err)
		}
		return d, nil
	}
	return fallback, nil
}

// checkDBSecret checks that the database URL, which carries a password, comes from a
// Secret and never from the manifest itself.
func checkDBSecret(c corev1.Container) error {
	for _, e := range c.Env {
		if e.Name == "RUNSERVICE_DB" && e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
			return nil
		}
	}
	return errors.New("RUNSERVICE_DB must come from a Secret (valueFrom.secretKeyRef)")
}

func checkSecurity(spec corev1.PodSpec, c corev1.Container) error {
	sc := c.SecurityContext
	nonRoot := (sc != nil && isTrue(sc.RunAsNonRoot)) ||
		(spec.SecurityContext != nil && isTrue(spec.SecurityContext.RunAsNonRoot))
	if !nonRoot || sc == nil || !isTrue(sc.ReadOnlyRootFilesystem) ||
		sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		return errors.New("the container needs runAsNonRoot, readOnlyRootFilesystem " +
			"and allowPrivilegeEscalation: false")
	}
	return nil
}

// checkMounts checks that every mount has its volume, and that secret volumes are
// mounted read-only.
func checkMounts(spec corev1.PodSpec, c corev1.Container) error {
	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
	}
	for _, m := range c.VolumeMounts {
		v, ok := volumes[m.Name]
		if !ok {
			return fmt.Errorf("volumeMount %s has no volume", m.Name)
		}
		if v.Secret != nil && !m.ReadOnly {
			return fmt.Errorf("secret volume %s must be mounted readOnly", m.Name)
		}
	}
	return nil
}

// checkServicePort checks that the Service exposes a port named grpc on 50051 that
// reaches the container's gRPC port.
func checkServicePort(s *corev1.Service, spec corev1.PodSpec) []error {
	if len(s.Spec.Ports) != 1 || len(spec.Containers) == 0 {
		return []error{errors.New("the Service needs exactly one port")}
	}
	p := s.Spec.Ports[0]
	if p.Name != "grpc" || p.Port != grpcPort {
		return []error{fmt.Errorf("the Service port must be named grpc, on %d", grpcPort)}
	}
	for _, cp := range spec.Containers[0].Ports {
		if targets(p.TargetPort, cp) && cp.ContainerPort == grpcPort {
			return nil
		}
	}
	return []error{fmt.Errorf("the Service's targetPort %s is not the container's port %d",
		p.TargetPort.String(), grpcPort)}
}

func targets(target intstr.IntOrString, cp corev1.ContainerPort) bool {
	if target.Type == intstr.String {
		return target.StrVal == cp.Name
	}
	return target.IntVal == cp.ContainerPort
}

func isTrue(b *bool) bool { return b != nil && *b }
